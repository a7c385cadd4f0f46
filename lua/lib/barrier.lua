--[[
lib/barrier.lua: the layout and helpers every key-value participant script shares (prepended to
each; see participant/src/kv.rs). The barrier *rules* are not here: the Rust runtime decides
(participant/src/barrier.rs) and a script only carries out one transition, if the barrier is
still in the state the runtime expects (compare-and-set), together with its business change.

Every script does all its reads and checks before its first write, and writes the barrier
first: on a Redis at its memory limit that first write is refused, so nothing changes and the
script fails (the request stays pending and is retried); once a script has written, Redis does
not refuse its later writes. Writes use redis.call (never pcall): an error aborts the script.

Shared input (of the whole call, sent once and bound before the first transition; the
`shared` values of lib/batch.lua):
  [1]          participant name (prefix of every reason)
  [2]          now, ms since the epoch (the worker's clock)
  [3]          retention, ms: a finished barrier is kept at least this long
  [4]          clock-skew margin, ms: a barrier with a deadline is kept until deadline + margin
  [5]          longest transaction timeout, ms: a finished barrier without a deadline (a
               tombstone, a saga step) is kept at least this long + margin

Common input (of each transition; a call carries a batch of them, laid out as lib/batch.lua
says):
  KEYS[1]      barrier, rtx:bar:<participant>:<txn> (hash: state, reason, deadline, keys,
               ops while prepared, "" once committed or
               aborted, at, done)
  KEYS[2i]     i-th distinct user key of the branch (i = 1..n), in first-use order
  KEYS[2i+1]   its lock, rtx:lock:<key> (string: the owner of the lock, ARGV[1])
  ARGV[1]      owner: this branch's lock value, "<participant> <txn>"
  ARGV[2]      expected barrier state ("" = no barrier yet)

Common output (participant/src/kv.rs: ScriptCode):
  {1, state, reason}             DONE: the barrier is now `state` ("reason" may be "")
  {2, state, reason, deadline, keys}
                                 MOVED: the barrier is not in the expected state (state "" = no
                                 barrier), or KEYS are not the branch's keys; nothing changed.
                                 `keys` is the barrier's recorded keys ("" = none): with the data
                                 on a Redis Cluster, whoever finds a home barrier `running` learns
                                 from it where the step's keys are
  {3, reason}                    BUSY: a saga step's key is locked by a 2PC branch; nothing
                                 changed
]]
local rcall = redis.call
-- The call's KEYS and ARGV hold a batch of transitions (lib/batch.lua). KEYS and ARGV below
-- are the current transition's, and every helper reads them and the names bound from them;
-- `bind` points them at the next transition.
local BATCH_KEYS, BATCH_ARGV = KEYS, ARGV
local KEYS, ARGV = {}, {}
-- The shared input (name; at = now as the string to record; numbers: now, retention, skew
-- margin, longest timeout) and the current transition's.
local name, at, now, retention, skew, longest
local bar, owner, expected, nkeys

-- Binds the call's shared input; returns an error text if it is not five values, the last four
-- integers.
local function bind_shared(s)
  name, at = s[1], s[2]
  now, retention, skew, longest = tonumber(s[2] or ''), tonumber(s[3] or ''), tonumber(s[4] or ''), tonumber(s[5] or '')
  if #s ~= 5 or not (now and retention and skew and longest) then
    return 'the shared input must be name, now, retention, skew margin, longest timeout'
  end
  return nil
end

-- Makes transition (keys, argv) the current one; returns an error text if its KEYS are not the
-- barrier then (key, lock) pairs.
local function bind(keys, argv)
  KEYS, ARGV = keys, argv
  bar, owner, expected = keys[1], argv[1], argv[2]
  if #keys % 2 ~= 1 then
    return 'KEYS must be the barrier then (key, lock) pairs'
  end
  nkeys = (#keys - 1) / 2
  return nil
end

-- The MOVED reply, unconditionally (the barrier as it is).
local function moved_anyway()
  local b = rcall('HMGET', bar, 'state', 'reason', 'deadline', 'keys')
  return {2, b[1] or '', b[2] or '', b[3] or '', b[4] or ''}
end

-- The MOVED reply if the barrier is not in the expected state, else nil.
local function moved()
  if expected == '' and rcall('EXISTS', bar) == 0 then
    return nil
  end
  local m = moved_anyway()
  if m[2] == expected then
    return nil
  end
  return m
end

-- A prepared branch's barrier, read once for its commit or abort: {state, reason, deadline,
-- keys, ops} (each false when absent).
local function read_prepared()
  return rcall('HMGET', bar, 'state', 'reason', 'deadline', 'keys', 'ops')
end

-- The MOVED reply for barrier fields b (as read_prepared gives them).
local function moved_from(b)
  return {2, b[1] or '', b[2] or '', b[3] or '', b[4] or ''}
end

-- Whether KEYS lists exactly the keys the branch was prepared with (raw: the barrier's `keys`).
local function same_keys(raw)
  if not raw then
    return false
  end
  local keys = cmsgpack.unpack(raw)
  if #keys ~= nkeys then
    return false
  end
  for i = 1, nkeys do
    if KEYS[2 * i] ~= keys[i] then
      return false
    end
  end
  return true
end

-- The branch's user keys, from KEYS.
local function user_keys()
  local keys = {}
  for i = 1, nkeys do
    keys[i] = KEYS[2 * i]
  end
  return keys
end

-- Lets a finished barrier expire: after the retention, but never before its deadline (a
-- string, or nil/false/"" for none) plus the skew margin, nor (without a deadline) before the
-- longest timeout plus the margin.
local function expire(deadline)
  local d = tonumber(deadline or '')
  local floor
  if d then
    floor = d - now + skew
  else
    floor = longest + skew
  end
  rcall('PEXPIRE', bar, string.format('%d', math.max(retention, floor)))
end

-- 2PC prepare: nil if every lock is free or already ours, else why the branch is refused.
local function lock_conflict()
  for i = 1, nkeys do
    local held = rcall('GET', KEYS[2 * i + 1])
    if held and held ~= owner then
      local _, txn = string.match(owner, '^(%S+) (.+)$')
      local other, other_txn = string.match(held, '^(%S+) (.+)$')
      if other_txn == txn then
        return name .. ': ' .. KEYS[2 * i] .. ' is also written by participant ' .. other ..
          ' in this transaction (they share a data Redis); put those ops in one branch'
      end
      return name .. ': conflict: ' .. KEYS[2 * i] .. ' is held by another transaction'
    end
  end
  return nil
end

-- Saga step: nil if no key is locked, else the BUSY reply (a saga never writes under a 2PC
-- branch's lock; the coordinator retries the step later).
local function busy()
  for i = 1, nkeys do
    if rcall('EXISTS', KEYS[2 * i + 1]) == 1 then
      return {3, name .. ': ' .. KEYS[2 * i] .. ' is locked by a 2PC transaction; retry later'}
    end
  end
  return nil
end

-- Releases the locks this branch still owns.
local function unlock()
  for i = 1, nkeys do
    if rcall('GET', KEYS[2 * i + 1]) == owner then
      rcall('DEL', KEYS[2 * i + 1])
    end
  end
end
