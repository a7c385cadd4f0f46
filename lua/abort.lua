--[[
abort: 2PC phase two (abort) of a prepared key-value branch (work `Cancel`), if the barrier is
still as expected: releases the branch's locks (those it still owns), empties the staged writes (`ops` = ""),
marks the barrier aborted and lets it expire after the retention. (An abort before any prepare,
or of a refused branch, changes only the barrier: mark.lua.)

Input (of each transition: a call carries a batch, see lua/lib/batch.lua):
  KEYS[1]       barrier, rtx:bar:<participant>:<txn>
  KEYS[2i]      i-th key the branch was prepared with (the barrier's `keys`, in order)
  KEYS[2i+1]    its lock, rtx:lock:<key>
  ARGV[1..2]    the common input (lua/lib/barrier.lua); the expected state is 'prepared'

Output (of each transition, in the batch's reply array):
  {1, 'aborted', reason}              aborted
  {2, state, reason, deadline, keys} MOVED: the barrier is not in the expected state, or KEYS
                                      are not the branch's keys; nothing changed
]]
-- rcall, bar, name, read_prepared, moved_from, same_keys, unlock, expire: lua/lib/barrier.lua
-- (prepended)

local function one()
  local b = read_prepared()
  if (b[1] or '') ~= expected or not same_keys(b[4]) then
    return moved_from(b)
  end
  local reason = name .. ': transaction was aborted'
  rcall('HSET', bar, 'state', 'aborted', 'reason', reason, 'done', at, 'ops', '')
  unlock()
  expire(b[3])
  return {1, 'aborted', reason}
end

return batch(one)
