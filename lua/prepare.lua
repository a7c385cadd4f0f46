--[[
prepare: 2PC phase one of a key-value branch (work `Try`), if the barrier is still as expected.

Checks everything first (barrier state, locks, guards on the simulated state of the branch's
keys), and only then writes: either the barrier `prepared` with the staged writes, plus the locks
(no-wait: a key another branch holds refuses at once), or the barrier `refused` with the reason.
Plain readers see nothing change: writes are staged in the barrier until `commit`.

Input (of each transition: a call carries a batch, see lua/lib/batch.lua):
  KEYS[1]       barrier, rtx:bar:<participant>:<txn>
  KEYS[2i]      i-th distinct user key of the branch (i = 1..n), in first-use order
  KEYS[2i+1]    its lock, rtx:lock:<key>
  ARGV[1..2]    the common input (lua/lib/barrier.lua); the expected state is "" (no barrier yet)
  ARGV[3]       the prepare's deadline, ms (recorded; the runtime refused late prepares already)
  ARGV[4]       refusal: "" or a reason to refuse without looking at the ops (the payload did
                not decode); then there are no ops and no key pairs
  ARGV[5..]    the ops, six slots each (lua/lib/ops.lua)

Output (of each transition, in the batch's reply array):
  {1, 'prepared', ''}                 locked, checked, staged (vote yes)
  {1, 'refused', reason}              a lock is held, a guard failed, or ARGV[4]; recorded (vote no)
  {2, state, reason, deadline, keys} MOVED: the barrier is not in the expected state
]]
-- rcall, bar, owner, name, moved, expire, lock_conflict, ...: lua/lib/barrier.lua
-- parse_int, add, ...: lua/lib/i64.lua; read_ops, simulate: lua/lib/ops.lua (all prepended)

local function one()
  local m = moved()
  if m then
    return m
  end
  local ops, bad = read_ops(5)
  if not ops then
    return redis.error_reply('prepare: ' .. bad)
  end
  local deadline = ARGV[3]

  local why = ARGV[4] ~= '' and ARGV[4] or lock_conflict()
  local staged
  if not why then
    staged, why = simulate(ops)
  end
  if why then
    rcall('HSET', bar, 'state', 'refused', 'reason', why, 'deadline', deadline, 'at', at)
    expire(deadline)
    return {1, 'refused', why}
  end

  -- Every check passed: now, and only now, write (the barrier first).
  rcall('HSET', bar, 'state', 'prepared', 'ops', cmsgpack.pack(staged), 'keys', cmsgpack.pack(user_keys()),
    'deadline', deadline, 'at', at)
  for i = 1, nkeys do
    rcall('SET', KEYS[2 * i + 1], owner)
  end
  return {1, 'prepared', ''}
end

return batch(one)
