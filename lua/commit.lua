--[[
commit: 2PC phase two of a prepared key-value branch (work `Confirm`), if the barrier is still
as expected.

Applies the writes staged by prepare, in order, releases the branch's locks (those it still
owns), empties the staging (`ops` = ""), marks the barrier committed and lets it expire after the retention.
The staged writes are checked again before the first write (a plain writer may have changed a
locked key's type or value meanwhile): if one of them would fail (wrong type, not an integer,
past the 64-bit range), the script fails with nothing changed (the commit stays pending, retried
and logged, until an operator repairs the key). A lone write that Redis itself refuses unchanged
in those cases (incrby, hincrby, hset, hdel, del: lib/ops.lua `unchecked`) is not simulated: it
is made first, and a refusal is reported the same way (simulated then, to name the cause). The guards (min, max, expect) are not checked
again: they held at prepare, and the locks keep other redtx transactions away.

Input (of each transition: a call carries a batch, see lua/lib/batch.lua):
  KEYS[1]       barrier, rtx:bar:<participant>:<txn>
  KEYS[2i]      i-th key the branch was prepared with (the barrier's `keys`, in order)
  KEYS[2i+1]    its lock, rtx:lock:<key>
  ARGV[1..2]    the common input (lua/lib/barrier.lua); the expected state is 'prepared'

Output (of each transition, in the batch's reply array):
  {1, 'committed', ''}                applied
  {2, state, reason, deadline, keys} MOVED: the barrier is not in the expected state, or KEYS
                                      are not the branch's keys; nothing changed
  error                               the staged writes no longer apply; nothing changed
]]
-- rcall, bar, read_prepared, moved_from, same_keys, unlock, expire: lua/lib/barrier.lua;
-- simulate, apply, unchecked, apply_first: lua/lib/ops.lua (all prepended)

local function one()
  local b = read_prepared()
  if (b[1] or '') ~= expected or not same_keys(b[4]) then
    return moved_from(b)
  end
  local staged = cmsgpack.unpack(b[5])
  local lone = unchecked(staged)
  local refused
  if lone then
    refused = apply_first(staged)
  end
  if refused or not lone then
    local ops = {}
    for k, w in ipairs(staged) do
      ops[k] = {w[1], w[2], w[3], w[4], '', ''}
    end
    local _, why = simulate(ops)
    if why then
      return redis.error_reply('commit: the staged writes no longer apply (was a locked key written outside redtx?): ' .. why)
    elseif refused then
      return redis.error_reply('commit: ' .. refused)
    end
  end

  rcall('HSET', bar, 'state', 'committed', 'done', at, 'ops', '')
  if not lone then
    apply(staged)
  end
  unlock()
  expire(b[3])
  return {1, 'committed', ''}
end

return batch(one)
