--[[
lease_renew: extends the lease of a partition, only if the caller still holds it.

Input:
  KEYS[1]      the lease, rtx:lease:{P}
  ARGV[1]      the lease value the caller holds
  ARGV[2]      new time to live, ms

Output:
  {1, value}   renewed
  {0, holder}  lost: held by `holder` ("" when it lapsed); the caller must step down
]]
local rcall = redis.call
local holder = rcall('GET', KEYS[1])
if holder ~= ARGV[1] then
  return {0, holder or ''}
end
rcall('PEXPIRE', KEYS[1], ARGV[2])
return {1, holder}
