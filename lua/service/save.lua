--[[
save: stores a service's image (its state and its barriers, one MessagePack blob) if no other
process saved one since this process loaded it: a compare-and-set on a version number, so two
instances of one service never overwrite each other's work. With an empty image it only checks
the version (a batch that changed nothing still must not answer from a stale image).

Input:
  KEYS[1]   the image hash, rtx:svc:<participant> (fields `version`, `image`)
  ARGV[1]   the version this process loaded ("0": there was none)
  ARGV[2]   the new image ("": check only, write nothing)

Output:
  {1, version}   saved (version = ARGV[1] + 1), or checked (version = ARGV[1])
  {2, version}   CONFLICT: another process saved version `version` meanwhile; nothing written
]]
local rcall = redis.call
local image = KEYS[1]

local found = rcall('HGET', image, 'version') or '0'
if found ~= ARGV[1] then
  return {2, found}
end
if ARGV[2] == '' then
  return {1, found}
end
local version = tostring(tonumber(ARGV[1]) + 1)
rcall('HSET', image, 'version', version, 'image', ARGV[2])
return {1, version}
