--[[
Shared part of commit.lua and abort.lua: prepended to each when it is loaded (see
participant/src/kv.rs), so it sees their KEYS/ARGV layout: KEYS[1] the barrier, then (user key,
lock key) pairs; ARGV[2] now (ms), ARGV[3] retention (ms).
]]
local rcall = redis.call
local bar = KEYS[1]
-- Margin for the skew between the worker's clock (ARGV[2]) and the Redis clock (expiry).
local SKEW_MS = 60000

-- Expiry of a finished barrier: the retention, but never before its deadline (+ margin).
local function expire_after(deadline)
  local ttl = math.max(tonumber(ARGV[3]), deadline - tonumber(ARGV[2]) + SKEW_MS)
  rcall('PEXPIRE', bar, string.format('%d', ttl))
end

-- The keys the branch was prepared with; nil and a detail if KEYS does not list exactly them.
local function prepared_keys()
  local keys = cmsgpack.unpack(rcall('HGET', bar, 'keys'))
  local same = (#keys * 2 + 1 == #KEYS)
  for i = 1, #keys do
    if KEYS[2 * i] ~= keys[i] or KEYS[2 * i + 1] ~= 'rtx:lock:' .. keys[i] then
      same = false
    end
  end
  if not same then
    return nil, 'prepared with keys [' .. table.concat(keys, ', ') .. ']'
  end
  return keys
end

-- Releases the locks still owned by this barrier and drops the staged writes.
local function release(keys)
  for i = 1, #keys do
    if rcall('GET', KEYS[2 * i + 1]) == bar then
      rcall('DEL', KEYS[2 * i + 1])
    end
  end
  rcall('HDEL', bar, 'ops')
end
