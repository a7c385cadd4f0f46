--[[
mark: a barrier-only transition (work `Mark`), if the barrier is still as expected: no business
change, no lock. Used for an abort before any prepare (a tombstone, so a late prepare is
refused), a prepare past its deadline (refused, nothing locked), the abort of a refused branch,
a null compensation (compensated before its action ran, so a late action is refused), and the
compensation of a failed action.

With the data on a Redis Cluster it also carries every change of a branch's home barrier
(rtx:bar:{P}:<participant>:<txn>, which holds no business data: the slot groups do, see
participant/src/kv/cluster.rs), including `prepared` and `running` with the branch's keys, and
tombstones a slot group's barrier. A barrier left `prepared` or `running` does not expire (it
waits for its decision); every other state does, as below.

Input (of each transition: a call carries a batch, see lua/lib/batch.lua):
  KEYS[1]       barrier, rtx:bar:<participant>:<txn>
  ARGV[1..7]    the common input (lua/lib/barrier.lua); the expected state is the one the runtime saw ("" = none)
  ARGV[8]       the new state
  ARGV[9]       the reason to record ("" = none)
  ARGV[10]      the deadline to record ("" = none; the barrier's own, if any, sets its expiry)
  ARGV[11]      the branch's user keys to record as `keys` (MessagePack array; "" = none)

Output (of each transition, in the batch's reply array):
  {1, state, reason}                  recorded (state = ARGV[8])
  {2, state, reason, deadline, keys} MOVED: the barrier is not in the expected state
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
  if (ARGV[11] or '') ~= '' then
    fields[#fields + 1] = 'keys'
    fields[#fields + 1] = ARGV[11]
  end
  rcall('HSET', bar, unpack(fields))
  if ARGV[8] == 'prepared' or ARGV[8] == 'running' then
    rcall('PERSIST', bar)
  elseif ARGV[10] ~= '' then
    expire(ARGV[10])
  else
    expire(rcall('HGET', bar, 'deadline'))
  end
  return {1, ARGV[8], ARGV[9]}
end

return batch(one)
