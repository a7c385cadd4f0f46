--[[
txn_vote: counts one participant's vote on the record and decides when it can.

Only a record in state "preparing" counts votes. The first vote of a branch wins; a repeat (or
a different later vote) changes nothing. All n branches voted yes -> "committing"; the first
no -> "aborting" with `reason` naming the participant. The decision (state, `decided`, `reason`)
is written here, before the caller sends any commit/abort (write-ahead).

Input:
  KEYS[1]   the record, rtx:txn:{<id>}
  ARGV[1]   branch index
  ARGV[2]   participant name (must be the branch's participant)
  ARGV[3]   "yes" or "no"
  ARGV[4]   the vote's reason ("" if none)
  ARGV[5]   now (ms since the epoch)

Output: {code, state, decided_now, branch_acked, spec}
  code           "ok"; "missing" (no record, nothing else follows);
                 "bad" (the second item is the detail: unknown branch or wrong participant)
  state          the record's state after this vote
  decided_now    1 if this vote made the decision, else 0
  branch_acked   1 if this branch has acked the decision already, else 0
  spec           the stored spec unless the state is "preparing" (then "")
]]
-- rcall, load_branch: lua/lib/record.lua (prepended).
local record = KEYS[1]
local branch, participant, vote, why, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local state, n, b = load_branch(record, branch, participant)
if not state then
  return n
end

local decided_now = 0
if state == 'preparing' and rcall('HSETNX', record, 'vote:' .. b, vote) == 1 then
  rcall('HSET', record, 'vt:' .. b, now, 'why:' .. b, why)
  if vote == 'yes' then
    if rcall('HINCRBY', record, 'yes', 1) == n then
      state = 'committing'
      rcall('HSET', record, 'state', state, 'decided', now)
      decided_now = 1
    end
  else
    local reason = why
    if reason == '' then
      reason = participant .. ' voted no'
    elseif not string.find(reason, participant, 1, true) then
      reason = participant .. ': ' .. reason
    end
    state = 'aborting'
    rcall('HSET', record, 'state', state, 'decided', now, 'reason', reason)
    decided_now = 1
  end
end

local acked = rcall('HEXISTS', record, 'ack:' .. b)
local spec = ''
if state ~= 'preparing' then
  spec = rcall('HGET', record, 'spec')
end
return {'ok', state, decided_now, acked, spec}
