--[[
execute: a saga step's action at a key-value participant (work `Action`), if the barrier is
still as expected: checks the ops on the simulated state of their keys, then either applies them
and records the barrier `done`, or records it `failed` with the reason (nothing applied). A key
held by a 2PC branch's lock makes the step BUSY (nothing written; the coordinator retries).
The barrier expires after the retention.

Input (of each transition: a call carries a batch, see lua/lib/batch.lua):
  KEYS[1]       barrier, rtx:bar:<participant>:<txn>
  KEYS[2i]      i-th distinct user key of the action (i = 1..n), in first-use order
  KEYS[2i+1]    its lock, rtx:lock:<key> (only read)
  ARGV[1..2]    the common input (lua/lib/barrier.lua); the expected state is "" (no barrier yet)
  ARGV[3]       refusal: "" or a reason to fail without looking at the ops (the payload did
                not decode); then there are no ops and no key pairs
  ARGV[4..]     the ops, six slots each (lua/lib/ops.lua)

Output (of each transition, in the batch's reply array):
  {1, 'done', ''}                     applied
  {1, 'failed', reason}               a guard failed, or ARGV[3]; nothing applied; recorded
  {2, state, reason, deadline, keys} MOVED: the barrier is not in the expected state
  {3, reason}                         BUSY: a key is locked by a 2PC branch; nothing changed
]]
-- rcall, bar, moved, busy, expire: lua/lib/barrier.lua; read_ops, simulate, apply:
-- lua/lib/ops.lua (all prepended)

local function one()
  local m = moved()
  if m then
    return m
  end
  local ops, bad = read_ops(4)
  if not ops then
    return redis.error_reply('execute: ' .. bad)
  end
  local writes, why = nil, (ARGV[3] ~= '' and ARGV[3] or nil)
  if not why then
    local b = busy()
    if b then
      return b
    end
    writes, why = simulate(ops)
  end
  if why then
    rcall('HSET', bar, 'state', 'failed', 'reason', why, 'at', at)
    expire(nil)
    return {1, 'failed', why}
  end
  rcall('HSET', bar, 'state', 'done', 'at', at)
  apply(writes)
  expire(nil)
  return {1, 'done', ''}
end

return batch(one)
