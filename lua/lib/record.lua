--[[
Shared part of txn_vote.lua and txn_ack.lua: prepended to each when it is loaded (see
coordinator/src/scripts.rs).
]]
local rcall = redis.call

-- Reads the record's state and branch count and checks that `branch` exists and belongs to
-- `participant`. Returns state, n, b (the branch as a number); or nil and the reply to return:
-- {"missing"} (no record) or {"bad", detail}.
local function load_branch(record, branch, participant)
  local h = rcall('HMGET', record, 'state', 'n')
  if not h[1] then
    return nil, {'missing'}
  end
  local state, n = h[1], tonumber(h[2])
  local b = tonumber(branch)
  if not b or b < 0 or b >= n or b % 1 ~= 0 then
    return nil, {'bad', 'branch ' .. branch .. ' does not exist (the transaction has ' .. n .. ')'}
  end
  local owner = rcall('HGET', record, 'p:' .. b)
  if owner ~= participant then
    return nil, {'bad', 'branch ' .. b .. ' belongs to ' .. tostring(owner) .. ', not ' .. participant}
  end
  return state, n, b
end
