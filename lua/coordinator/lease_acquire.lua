--[[
lease_acquire: takes the lease of a partition if nobody holds it, with the next fencing token.

Input:
  KEYS[1]      the lease, rtx:lease:{P}
  KEYS[2]      the fencing counter, rtx:epoch:{P} (never expires)
  ARGV[1]      the caller's coordinator id
  ARGV[2]      time to live of the lease, ms

Output:
  {1, value}   acquired: value is "<token>:<owner>", what the fenced writes must present
  {0, holder}  held by someone else (holder is its value)
]]
local rcall = redis.call
local holder = rcall('GET', KEYS[1])
if holder then
  return {0, holder}
end
local token = rcall('INCR', KEYS[2])
local value = token .. ':' .. ARGV[1]
rcall('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
