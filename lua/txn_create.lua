--[[
txn_create: creates the record of a 2PC transaction if it does not exist yet.

An existing record is left untouched: a resubmitted id never creates a second transaction, and
the stored spec wins over the one in this submit. The caller then schedules the deadline and
(re)sends prepares (state preparing) or the decision (committing/aborting).

Input:
  KEYS[1]        the record, rtx:txn:{<id>}
  ARGV[1]        mode ("2pc")
  ARGV[2]        spec (MessagePack of TxnSpec, named fields)
  ARGV[3]        now (ms since the epoch)
  ARGV[4]        deadline (ms): now + the spec's timeout
  ARGV[5]        n, the number of branches
  ARGV[6..5+n]   participant of branch 0 .. n-1

Output: {created, state, deadline, spec}
  created    1 if this call created the record, 0 if it existed already
  state      the record's state ("preparing" when created)
  deadline   the record's vote deadline (ms)
  spec       the stored spec when the record existed already, "" when created
]]
local rcall = redis.call
local record = KEYS[1]

local existing = rcall('HMGET', record, 'state', 'deadline', 'spec')
if existing[1] then
  return {0, existing[1], existing[2] or '0', existing[3] or ''}
end

local n = tonumber(ARGV[5])
local fields = {
  'v', 1, 'mode', ARGV[1], 'state', 'preparing', 'n', n, 'spec', ARGV[2],
  'created', ARGV[3], 'deadline', ARGV[4], 'yes', 0, 'acks', 0,
}
for i = 0, n - 1 do
  fields[#fields + 1] = 'p:' .. i
  fields[#fields + 1] = ARGV[6 + i]
end
rcall('HSET', record, unpack(fields))
return {1, 'preparing', ARGV[4], ''}
