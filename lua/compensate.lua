--[[
compensate: undoes a saga step's action at a key-value participant (work `Compensation`) by
applying the compensation's ops, if the barrier is still as expected (the action is `done`),
and records the barrier `compensated`. A compensation whose guard fails changes nothing and
leaves the barrier `done` (the coordinator retries it). A key held by a 2PC branch's lock makes
it BUSY (nothing written). The barrier expires after the retention.

Input (of each transition: a call carries a batch, see lua/lib/batch.lua):
  KEYS[1]       barrier, rtx:bar:<participant>:<txn>
  KEYS[2i]      i-th distinct user key of the compensation (i = 1..n), in first-use order
  KEYS[2i+1]    its lock, rtx:lock:<key> (only read)
  ARGV[1..2]    the common input (lua/lib/barrier.lua); the expected state is 'done'
  ARGV[3]       refusal: "" or a reason to refuse without looking at the ops (the payload did
                not decode); then there are no ops and no key pairs
  ARGV[4..]     the compensation's ops, six slots each (lua/lib/ops.lua)

Output (of each transition, in the batch's reply array):
  {1, 'compensated', ''}              undone
  {1, 'done', reason}                 a guard failed, or ARGV[3]; nothing changed (still done)
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
    return redis.error_reply('compensate: ' .. bad)
  end
  if ARGV[3] ~= '' then
    return {1, 'done', ARGV[3]}
  end
  local b = busy()
  if b then
    return b
  end
  local writes, why = simulate(ops)
  if not writes then
    return {1, 'done', why}
  end
  rcall('HSET', bar, 'state', 'compensated', 'at', at)
  apply(writes)
  expire(nil)
  return {1, 'compensated', ''}
end

return batch(one)
