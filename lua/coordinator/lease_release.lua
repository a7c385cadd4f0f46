--[[
lease_release: gives a partition up, only if the caller still holds it.

Input:
  KEYS[1]      the lease, rtx:lease:{P}
  ARGV[1]      the lease value the caller holds

Output:
  {1, ""}      released
  {0, holder}  not held by the caller (nothing changed)
]]
local rcall = redis.call
local holder = rcall('GET', KEYS[1])
if holder ~= ARGV[1] then
  return {0, holder or ''}
end
rcall('DEL', KEYS[1])
return {1, ''}
