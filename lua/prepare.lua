--[[
prepare: phase one of a 2PC branch at a key-value participant. Idempotent.

Checks everything first (barrier state, deadline, locks, guards on the simulated state of the
branch's keys), and only then writes: either the locks plus the staged writes (vote yes) or a
refusal record (vote no). Nothing a plain reader sees changes: writes are staged in the barrier
until `commit`.

Counters are checked exactly over the whole signed 64-bit range: Lua numbers are doubles (exact
only up to 2^53), so INCRBY/HINCRBY results are added and compared as decimal strings.

Input:
  KEYS[1]            barrier, rtx:bar:<participant>:<txn> (hash)
  KEYS[2i]           i-th distinct user key of the branch (i = 1..n, in Branch::keys() order)
  KEYS[2i+1]         lock of that key, rtx:lock:<key> (string: the owning barrier key)
  ARGV[1]            participant name (prefix of every refusal reason)
  ARGV[2]            now, ms since the epoch (the worker's clock)
  ARGV[3]            retention of a refusal record, ms; it is kept at least until the
                     deadline plus SKEW_MS, so that a duplicate prepare arriving before the
                     deadline always finds it
  ARGV[4]            deadline_ms of the prepare; a later `now` refuses without locking
  ARGV[5+6j .. 10+6j] op j+1 (j = 0..), six slots each:
                       name   set | del | incrby | hset | hdel | hincrby | expect | absent
                              (absent = expect with a null value: the key must not exist)
                       i      index of the op's key in KEYS (the key is KEYS[2i])
                       field  hash field ("" for non-hash ops)
                       arg    value (set, hset, expect) or decimal `by` (incrby, hincrby)
                       min    decimal lower bound, "" for none
                       max    decimal upper bound, "" for none

Output: {code, reason}
   1, ""      prepared now: locks taken, writes staged, state=prepared (vote yes)
   2, ""      already prepared or committed: a repeat (vote yes again)
   0, reason  refused now, state=refused with the reason, expires after retention (vote no)
   3, reason  already refused or aborted (repeat, or abort came first): vote no again; also
              (nothing written) when a finished barrier holds another deadline: an earlier
              transaction with the same id, not this one
]]
local rcall = redis.call
local bar = KEYS[1]
local name = ARGV[1]
local now = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
local deadline = tonumber(ARGV[4])
-- Margin for the skew between the worker's clock (`now`) and the Redis clock (expiry).
local SKEW_MS = 60000

if #KEYS % 2 ~= 1 then
  return redis.error_reply('prepare: KEYS must be the barrier then (key, lock) pairs')
end
local nkeys = (#KEYS - 1) / 2

local state = rcall('HGET', bar, 'state')
-- A finished barrier recorded with another deadline is the outcome of an earlier transaction
-- with this id (its record expired and the id was submitted again: a new record, a new
-- deadline), not of this one: it must not answer for it (a `yes` without staging anything would
-- report the new transaction committed without applying it here). Vote no, writing nothing: the
-- old outcome stays for its own duplicates. (An `aborted` tombstone written before any prepare
-- has no deadline and refuses anyway.)
if state == 'committed' or state == 'refused' or state == 'aborted' then
  local d = rcall('HGET', bar, 'deadline')
  if d and d ~= ARGV[4] then
    return {3, name .. ': an earlier transaction with this id finished here ' ..
      'and is still remembered; submit the new one under a new id'}
  end
end
if state == 'prepared' or state == 'committed' then
  return {2, ''}
end
if state == 'refused' or state == 'aborted' then
  return {3, rcall('HGET', bar, 'reason') or (name .. ': transaction was aborted')}
end

local function refuse(reason)
  rcall('HSET', bar, 'state', 'refused', 'reason', reason, 'at', ARGV[2], 'deadline', ARGV[4])
  rcall('PEXPIRE', bar, string.format('%d', math.max(retention, deadline - now + SKEW_MS)))
  return {0, reason}
end

if now > deadline then
  return refuse(name .. ': prepare arrived ' .. string.format('%d', now - deadline) .. ' ms after the deadline')
end

-- No-wait locking: any key held by another barrier refuses at once.
for i = 1, nkeys do
  local owner = rcall('GET', KEYS[2 * i + 1])
  if owner and owner ~= bar then
    return refuse(name .. ': conflict: ' .. KEYS[2 * i] .. ' is held by another transaction')
  end
end

-- Exact signed 64-bit integers as {negative, digits} (digits without leading zeros; zero is
-- never negative).
local function cmp_mag(a, b)
  if #a ~= #b then
    return (#a < #b) and -1 or 1
  end
  if a == b then
    return 0
  end
  return (a < b) and -1 or 1
end

local function cmp(x, y)
  if x[1] ~= y[1] then
    return x[1] and -1 or 1
  end
  local c = cmp_mag(x[2], y[2])
  if x[1] then
    return -c
  end
  return c
end

local function digits_of(t)
  local out = {}
  for k = #t, 1, -1 do
    out[#out + 1] = t[k]
  end
  local s = string.gsub(table.concat(out), '^0+', '')
  if s == '' then
    return '0'
  end
  return s
end

local function add_mag(a, b)
  local t, carry, i, j = {}, 0, #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local d = carry
    if i > 0 then d = d + string.byte(a, i) - 48 end
    if j > 0 then d = d + string.byte(b, j) - 48 end
    t[#t + 1] = d % 10
    carry = (d >= 10) and 1 or 0
    i = i - 1
    j = j - 1
  end
  return digits_of(t)
end

-- a - b for magnitudes with a >= b.
local function sub_mag(a, b)
  local t, borrow, i, j = {}, 0, #a, #b
  while i > 0 do
    local d = string.byte(a, i) - 48 - borrow
    if j > 0 then d = d - (string.byte(b, j) - 48) end
    if d < 0 then
      d = d + 10
      borrow = 1
    else
      borrow = 0
    end
    t[#t + 1] = d
    i = i - 1
    j = j - 1
  end
  return digits_of(t)
end

local function add(x, y)
  if x[1] == y[1] then
    return {x[1], add_mag(x[2], y[2])}
  end
  local c = cmp_mag(x[2], y[2])
  if c == 0 then
    return {false, '0'}
  elseif c > 0 then
    return {x[1], sub_mag(x[2], y[2])}
  end
  return {y[1], sub_mag(y[2], x[2])}
end

local function show(x)
  return (x[1] and '-' or '') .. x[2]
end

local I64_MIN = {true, '9223372036854775808'}
local I64_MAX = {false, '9223372036854775807'}
local ZERO = {false, '0'}

local function in_i64(x)
  return cmp(x, I64_MIN) >= 0 and cmp(x, I64_MAX) <= 0
end

-- Parses an integer exactly as Redis does (no sign '+', no leading zeros, no spaces, no "-0",
-- within i64). Returns nil otherwise.
local function parse_int(s)
  if type(s) ~= 'string' or #s == 0 or #s > 20 then
    return nil
  end
  local neg, digits = false, s
  if string.sub(s, 1, 1) == '-' then
    neg, digits = true, string.sub(s, 2)
  end
  if not string.find(digits, '^[0-9]+$') then
    return nil
  end
  if #digits > 1 and string.sub(digits, 1, 1) == '0' then
    return nil
  end
  if neg and digits == '0' then
    return nil
  end
  local x = {neg, digits}
  if not in_i64(x) then
    return nil
  end
  return x
end

local function quote(v)
  if #v > 64 then
    v = string.sub(v, 1, 64) .. '...'
  end
  return '"' .. v .. '"'
end

-- Simulated state of each key, read lazily (all reads happen before any write).
-- t: Redis type ('none', 'string', 'hash', ...); v: string value (nil = not read yet);
-- n: hash length; fields: field -> value or false (absent); fresh: no need to read Redis.
local sim = {}
local function key_state(i)
  local s = sim[i]
  if not s then
    local t = rcall('TYPE', KEYS[2 * i])['ok']
    s = {t = t, fields = {}, fresh = (t == 'none'), n = 0}
    if t == 'hash' then
      s.n = rcall('HLEN', KEYS[2 * i])
    end
    sim[i] = s
  end
  return s
end

local function str_value(s, i)
  if s.v == nil then
    s.v = rcall('GET', KEYS[2 * i])
  end
  return s.v
end

local function field_value(s, i, f)
  local v = s.fields[f]
  if v == nil then
    if s.fresh then
      v = false
    else
      v = rcall('HGET', KEYS[2 * i], f)
    end
    s.fields[f] = v
  end
  return v
end

local function clear(s)
  s.t, s.v, s.n, s.fields, s.fresh = 'none', nil, 0, {}, true
end

local function as_hash(s)
  if s.t == 'none' then
    clear(s)
    s.t = 'hash'
  end
end

local function wrong_type(key, s, op, want)
  return name .. ': ' .. key .. ' is a ' .. s.t .. ', ' .. op .. ' needs a ' .. want
end

-- Checks a counter change; returns the new value or nil plus a refusal reason.
local function bump(what, cur_raw, by_raw, min_raw, max_raw)
  local cur = ZERO
  if cur_raw then
    cur = parse_int(cur_raw)
    if not cur then
      return nil, name .. ': ' .. what .. ' is ' .. quote(cur_raw) .. ', not an integer'
    end
  end
  local by = parse_int(by_raw)
  if not by then
    return nil, name .. ': increment ' .. quote(by_raw) .. ' for ' .. what .. ' is not a 64-bit integer'
  end
  local new = add(cur, by)
  if not in_i64(new) then
    return nil, name .. ': ' .. what .. ' would be ' .. show(new) .. ', outside the 64-bit integer range'
  end
  if min_raw ~= '' then
    local lo = parse_int(min_raw)
    if lo and cmp(new, lo) < 0 then
      return nil, name .. ': ' .. what .. ' would be ' .. show(new) .. ', below min ' .. min_raw
    end
  end
  if max_raw ~= '' then
    local hi = parse_int(max_raw)
    if hi and cmp(new, hi) > 0 then
      return nil, name .. ': ' .. what .. ' would be ' .. show(new) .. ', above max ' .. max_raw
    end
  end
  return show(new)
end

local staged = {}
local a = 5
while a + 5 <= #ARGV do
  local op, i, f, arg, lo, hi = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  a = a + 6
  if not i or i < 1 or i > nkeys then
    return redis.error_reply('prepare: op key index out of range')
  end
  local key = KEYS[2 * i]
  local s = key_state(i)
  if op == 'set' then
    if s.t ~= 'none' and s.t ~= 'string' then
      return refuse(wrong_type(key, s, op, 'string'))
    end
    clear(s)
    s.t, s.v, s.fresh = 'string', arg, false
  elseif op == 'del' then
    clear(s)
  elseif op == 'incrby' then
    if s.t ~= 'none' and s.t ~= 'string' then
      return refuse(wrong_type(key, s, op, 'string'))
    end
    local cur = false
    if s.t == 'string' then
      cur = str_value(s, i)
    end
    local new, why = bump(key, cur, arg, lo, hi)
    if not new then
      return refuse(why)
    end
    clear(s)
    s.t, s.v, s.fresh = 'string', new, false
  elseif op == 'hset' or op == 'hincrby' then
    if s.t ~= 'none' and s.t ~= 'hash' then
      return refuse(wrong_type(key, s, op, 'hash'))
    end
    as_hash(s)
    local old = field_value(s, i, f)
    local new = arg
    if op == 'hincrby' then
      local why
      new, why = bump(key .. ' field ' .. f, old, arg, lo, hi)
      if not new then
        return refuse(why)
      end
    end
    if old == false then
      s.n = s.n + 1
    end
    s.fields[f] = new
  elseif op == 'hdel' then
    if s.t ~= 'none' and s.t ~= 'hash' then
      return refuse(wrong_type(key, s, op, 'hash'))
    end
    if s.t == 'hash' and field_value(s, i, f) ~= false then
      s.fields[f] = false
      s.n = s.n - 1
      if s.n <= 0 then
        clear(s)
      end
    end
  elseif op == 'expect' then
    if s.t == 'none' then
      return refuse(name .. ': ' .. key .. ' does not exist, expected ' .. quote(arg))
    elseif s.t ~= 'string' then
      return refuse(wrong_type(key, s, op, 'string'))
    end
    local cur = str_value(s, i)
    if cur ~= arg then
      return refuse(name .. ': ' .. key .. ' is ' .. quote(cur) .. ', expected ' .. quote(arg))
    end
  elseif op == 'absent' then
    if s.t == 'string' then
      return refuse(name .. ': ' .. key .. ' is ' .. quote(str_value(s, i)) .. ', expected it not to exist')
    elseif s.t ~= 'none' then
      return refuse(name .. ': ' .. key .. ' exists (a ' .. s.t .. '), expected it not to exist')
    end
  else
    return redis.error_reply('prepare: unknown op ' .. tostring(op))
  end
  if op ~= 'expect' and op ~= 'absent' then
    staged[#staged + 1] = {op, i, f, arg}
  end
end
if a ~= #ARGV + 1 then
  return redis.error_reply('prepare: ARGV must hold whole ops of six slots')
end

-- Every check passed: now, and only now, write.
local keys = {}
for i = 1, nkeys do
  keys[i] = KEYS[2 * i]
  rcall('SET', KEYS[2 * i + 1], bar)
end
rcall('HSET', bar, 'state', 'prepared', 'ops', cmsgpack.pack(staged), 'keys', cmsgpack.pack(keys),
  'deadline', ARGV[4], 'at', ARGV[2])
rcall('PERSIST', bar)
return {1, ''}
