--[[
txn_ack: counts one participant's acknowledgement of the decision and finishes the transaction
when every branch has acked.

The first ack of a branch counts; repeats change nothing. When all n branches acked,
committing -> committed / aborting -> aborted, `finished` is set and the record expires after the
retention window. An ack before the decision, or one whose outcome is not the decision, is a
protocol violation and changes nothing.

Input:
  KEYS[1]   the record, rtx:txn:{<id>}
  ARGV[1]   branch index
  ARGV[2]   participant name (must be the branch's participant)
  ARGV[3]   outcome: "committed" or "aborted"
  ARGV[4]   now (ms since the epoch)
  ARGV[5]   retention (ms): how long the finished record is kept

Output: {code, state, finished_now}
  code           "ok"; "missing" (no record, nothing else follows);
                 "bad" / "violation" (the second item is the detail)
  state          the record's state after this ack
  finished_now   1 if this ack made the transaction terminal, else 0
]]
-- rcall, load_branch: lua/lib/record.lua (prepended).
local record = KEYS[1]
local branch, participant, outcome, now, retention = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local state, n, b = load_branch(record, branch, participant)
if not state then
  return n
end

local decided
if state == 'committing' or state == 'committed' then
  decided = 'committed'
elseif state == 'aborting' or state == 'aborted' then
  decided = 'aborted'
else
  return {'violation', participant .. ' acked ' .. outcome .. ' while the transaction is ' .. state}
end
if outcome ~= decided then
  return {'violation', participant .. ' acked ' .. outcome .. ' but the decision is ' .. decided}
end

local finished_now = 0
if rcall('HSETNX', record, 'ack:' .. b, outcome) == 1 then
  rcall('HSET', record, 'at:' .. b, now)
  if rcall('HINCRBY', record, 'acks', 1) == n and (state == 'committing' or state == 'aborting') then
    state = decided
    rcall('HSET', record, 'state', state, 'finished', now)
    rcall('PEXPIRE', record, retention)
    finished_now = 1
  end
end
return {'ok', state, finished_now}
