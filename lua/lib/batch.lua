--[[
lib/batch.lua: runs one verb on a batch of transitions in one call (appended to each verb
script; see participant/src/kv.rs). One call per verb per batch instead of one per transition
saves the per-call cost (command dispatch, KEYS/ARGV tables, the helpers' closures) that used to
dominate a participant's Redis time.

Input (the whole call):
  KEYS          every transition's KEYS, one after the other
  ARGV[1]       n, the number of transitions
  ARGV[2]       s, the number of values every transition shares (sent once: lib/barrier.lua's
                shared input)
  ARGV[3..s+2]  the shared values
  ARGV[s+1+2j]  number of KEYS of transition j (j = 1..n)
  ARGV[s+2+2j]  number of ARGV of transition j
  ARGV[s+2n+3..] every transition's own ARGV, one after the other

Output:
  an array of n replies, in order: each the verb's own reply for that transition, or
  {0, message} when that transition failed (its KEYS were malformed, or the verb returned an
  error); nothing of a failed transition was written

A transition that raises an error (a Redis command refusing, e.g. at the memory limit, which
only the call's first write can meet) fails the whole call; the runtime then runs the
transitions one per call, so one bad transition never holds the others back. Transitions are
independent: each does all its checks before its first write, as if it were alone.
]]
local function batch(one)
  local n, s = tonumber(BATCH_ARGV[1]), tonumber(BATCH_ARGV[2])
  if not n or not s or #BATCH_ARGV < s + 2 * n + 2 then
    return redis.error_reply('batch: ARGV must be the number of transitions, the shared values, then their sizes')
  end
  local bad = bind_shared({unpack(BATCH_ARGV, 3, s + 2)})
  if bad then
    return redis.error_reply('batch: ' .. bad)
  end
  local out = {}
  local k, a = 1, s + 2 * n + 3
  for j = 1, n do
    local nk, na = tonumber(BATCH_ARGV[s + 1 + 2 * j]), tonumber(BATCH_ARGV[s + 2 + 2 * j])
    -- unpack sizes each table once, in C (a loop of appends regrows it step by step).
    local bad = bind({unpack(BATCH_KEYS, k, k + nk - 1)}, {unpack(BATCH_ARGV, a, a + na - 1)})
    k, a = k + nk, a + na
    if bad then
      out[j] = {0, bad}
    else
      local r = one()
      if type(r) == 'table' and r.err then
        r = {0, r.err}
      end
      out[j] = r
    end
  end
  return out
end
