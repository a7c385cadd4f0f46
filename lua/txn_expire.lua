--[[
txn_expire: what a coordinator's deadline scan does with one transaction that is due.

A record still "preparing" at or after its deadline moves to "aborting" (write-ahead, before any
abort is sent) with reason "timeout: <participants without a vote> did not vote within <timeout>".
Any other record is only reported, so the caller can re-send the decision to the branches that
have not acked, publish a terminal outcome, or drop the deadline of a missing record.

Input:
  KEYS[1]   the record, rtx:txn:{<id>}
  ARGV[1]   now (ms since the epoch)

Output: {code, state, decided_now, deadline, decided, acked, spec}
  code          "ok", or "missing" (no record, nothing else follows)
  state         the record's state after this call
  decided_now   1 if this call aborted the transaction (deadline passed), else 0
  deadline      the vote deadline (ms)
  decided       when the decision was written (ms), "" if not decided
  acked         one character per branch, "1" if that branch acked, else "0"
  spec          the stored spec if the state is "committing" or "aborting", else ""
]]
local rcall = redis.call
local record = KEYS[1]
local now = ARGV[1]

local h = rcall('HMGET', record, 'state', 'n', 'deadline', 'created', 'decided')
if not h[1] then
  return {'missing'}
end
local state, n, deadline, created, decided = h[1], tonumber(h[2]), h[3], h[4], h[5] or ''

-- humantime's format for a duration of up to a day: "1h 2m 3s 4ms", "0s" for nothing.
local function human(ms)
  if ms <= 0 then
    return '0s'
  end
  local parts = {}
  for _, u in ipairs({{'h', 3600000}, {'m', 60000}, {'s', 1000}, {'ms', 1}}) do
    local q = math.floor(ms / u[2])
    if q > 0 then
      parts[#parts + 1] = string.format('%d%s', q, u[1])
      ms = ms - q * u[2]
    end
  end
  return table.concat(parts, ' ')
end

local decided_now = 0
if state == 'preparing' and tonumber(now) >= tonumber(deadline) then
  local silent = {}
  for i = 0, n - 1 do
    if rcall('HEXISTS', record, 'vote:' .. i) == 0 then
      silent[#silent + 1] = rcall('HGET', record, 'p:' .. i)
    end
  end
  local timeout = human(tonumber(deadline) - tonumber(created))
  local reason
  if #silent > 0 then
    reason = 'timeout: ' .. table.concat(silent, ', ') .. ' did not vote within ' .. timeout
  else
    reason = 'timeout: no decision within ' .. timeout
  end
  state = 'aborting'
  decided = now
  rcall('HSET', record, 'state', state, 'decided', now, 'reason', reason)
  decided_now = 1
end

local acked = {}
for i = 0, n - 1 do
  acked[#acked + 1] = tostring(rcall('HEXISTS', record, 'ack:' .. i))
end
local spec = ''
if state == 'committing' or state == 'aborting' then
  spec = rcall('HGET', record, 'spec')
end
return {'ok', state, decided_now, deadline, decided, table.concat(acked), spec}
