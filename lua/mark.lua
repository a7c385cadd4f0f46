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
  ARGV[1..2]    the common input (lua/lib/barrier.lua); the expected state is the one the runtime saw ("" = none)
  ARGV[3]       the new state
  ARGV[4]       the reason to record ("" = none)
  ARGV[5]       the deadline to record ("" = none; the barrier's own, if any, sets its expiry)
  ARGV[6]       the branch's user keys to record as `keys` (MessagePack array; "" = none)

Output (of each transition, in the batch's reply array):
  {1, state, reason}                  recorded (state = ARGV[3])
  {2, state, reason, deadline, keys} MOVED: the barrier is not in the expected state
]]
-- rcall, bar, moved, expire: lua/lib/barrier.lua (prepended)

local function one()
  local m = moved()
  if m then
    return m
  end
  local fields = {'state', ARGV[3], 'at', at}
  if ARGV[4] ~= '' then
    fields[#fields + 1] = 'reason'
    fields[#fields + 1] = ARGV[4]
  end
  if ARGV[5] ~= '' then
    fields[#fields + 1] = 'deadline'
    fields[#fields + 1] = ARGV[5]
  end
  if (ARGV[6] or '') ~= '' then
    fields[#fields + 1] = 'keys'
    fields[#fields + 1] = ARGV[6]
  end
  rcall('HSET', bar, unpack(fields))
  if ARGV[3] == 'prepared' or ARGV[3] == 'running' then
    rcall('PERSIST', bar)
  elseif ARGV[5] ~= '' then
    expire(ARGV[5])
  else
    expire(rcall('HGET', bar, 'deadline'))
  end
  return {1, ARGV[3], ARGV[4]}
end

return batch(one)
