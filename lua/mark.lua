--[[
mark: a barrier-only transition (work `Mark`), if the barrier is still as expected: no business
change, no lock. Used for an abort before any prepare (a tombstone, so a late prepare is
refused), a prepare past its deadline (refused, nothing locked), the abort of a refused branch,
a null compensation (compensated before its action ran, so a late action is refused), and the
compensation of a failed action.

Input (of each transition: a call carries a batch, see lua/lib/batch.lua):
  KEYS[1]       barrier, rtx:bar:<participant>:<txn>
  ARGV[1..7]    the common input (lua/lib/barrier.lua); the expected state is the one the runtime saw ("" = none)
  ARGV[8]       the new state
  ARGV[9]       the reason to record ("" = none)
  ARGV[10]      the deadline to record ("" = none; the barrier's own, if any, sets its expiry)

Output (of each transition, in the batch's reply array):
  {1, state, reason}                  recorded (state = ARGV[8])
  {2, state, reason, deadline}        MOVED: the barrier is not in the expected state
]]
-- rcall, bar, moved, expire: lua/lib/barrier.lua (prepended)

local function one()
  local m = moved()
  if m then
    return m
  end
  local fields = {'state', ARGV[8], 'at', ARGV[4]}
  if ARGV[9] ~= '' then
    fields[#fields + 1] = 'reason'
    fields[#fields + 1] = ARGV[9]
  end
  if ARGV[10] ~= '' then
    fields[#fields + 1] = 'deadline'
    fields[#fields + 1] = ARGV[10]
  end
  rcall('HSET', bar, unpack(fields))
  if ARGV[10] ~= '' then
    expire(ARGV[10])
  else
    expire(rcall('HGET', bar, 'deadline'))
  end
  return {1, ARGV[8], ARGV[9]}
end

return batch(one)
