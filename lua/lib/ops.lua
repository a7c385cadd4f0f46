--[[
lib/ops.lua: the key-value ops of a branch, checked on a simulated state and then applied.
Prepended after lib/barrier.lua and lib/i64.lua (it uses rcall, name, nkeys, and the i64
helpers).

Ops come in ARGV in six slots each (read_ops):
  name   set | del | incrby | hset | hdel | hincrby | expect | absent
         (absent = expect with a null value: the key must not exist)
  i      index of the op's key in KEYS (the key is KEYS[2i])
  field  hash field ("" for non-hash ops)
  arg    value (set, hset, expect) or decimal `by` (incrby, hincrby)
  min    decimal lower bound, "" for none
  max    decimal upper bound, "" for none

  read_ops(from)  the ops from ARGV[from] on, or nil and an error
  simulate(ops)   checks every op in order against the current values (read only): the writes
                  to make ({op, i, field, arg}, guards dropped), or nil and the refusal reason
  apply(writes)   makes the writes (redis.call: any error aborts the script)
  unchecked(writes), apply_first(writes)
                  a lone write that Redis refuses unchanged whenever simulate would (not
                  `set`) needs no simulation: it goes first, with redis.pcall, and its refusal
                  is returned
]]

local function read_ops(from)
  local ops = {}
  local a = from
  while a + 5 <= #ARGV do
    local i = tonumber(ARGV[a + 1])
    if not i or i < 1 or i > nkeys then
      return nil, 'op key index out of range'
    end
    ops[#ops + 1] = {ARGV[a], i, ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]}
    a = a + 6
  end
  if a ~= #ARGV + 1 then
    return nil, 'ARGV must hold whole ops of six slots'
  end
  return ops
end

local function quote(v)
  if #v > 64 then
    v = string.sub(v, 1, 64) .. '...'
  end
  return '"' .. v .. '"'
end

-- The helpers of simulate, defined once per call of the script rather than once per op list.
-- sim: the simulated state of each key of the current op list, read lazily. t: Redis type
-- ('none', 'string', 'hash', ...); v: string value (nil = not read yet); n: hash length;
-- fields: field -> value or false (absent); fresh: no need to read Redis.
local sim
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

-- key_state for an op on a string: one GET reads the type and the value together (a key of
-- another type answers WRONGTYPE, and TYPE tells which).
local function string_state(i)
  if not sim[i] then
    local v = redis.pcall('GET', KEYS[2 * i])
    if type(v) == 'table' and v.err then
      return key_state(i)
    end
    if v then
      sim[i] = {t = 'string', v = v, fields = {}, fresh = false, n = 0}
    else
      sim[i] = {t = 'none', fields = {}, fresh = true, n = 0}
    end
  end
  return sim[i]
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

local function wrong_type(key, s, op, want)
  return name .. ': ' .. key .. ' is a ' .. s.t .. ', ' .. op .. ' needs a ' .. want
end

-- A decimal in Redis's integer syntax short enough (15 digits) for a Lua number to hold it,
-- and any sum of two of them, exactly; nil otherwise.
local function small(s)
  if #s <= 15 and (string.find(s, '^-?[1-9][0-9]*$') or s == '0') then
    return tonumber(s)
  end
  return nil
end

-- Checks a counter change; returns the new value or nil plus a refusal reason.
local function bump(what, cur_raw, by_raw, min_raw, max_raw)
  -- Fast path: every number small, so doubles are exact; else exact decimal arithmetic.
  local c, b = (cur_raw and small(cur_raw)) or (not cur_raw and 0), small(by_raw)
  local lo, hi = min_raw == '' or small(min_raw), max_raw == '' or small(max_raw)
  if c and b and lo and hi then
    local n = c + b
    local shown = string.format('%d', n)
    if lo ~= true and n < lo then
      return nil, name .. ': ' .. what .. ' would be ' .. shown .. ', below min ' .. min_raw
    end
    if hi ~= true and n > hi then
      return nil, name .. ': ' .. what .. ' would be ' .. shown .. ', above max ' .. max_raw
    end
    return shown
  end
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

local function simulate(ops)
  sim = {}
  local writes = {}
  for _, o in ipairs(ops) do
    local op, i, f, arg, lo, hi = o[1], o[2], o[3], o[4], o[5], o[6]
    local key = KEYS[2 * i]
    local s
    if op == 'set' or op == 'incrby' or op == 'expect' or op == 'absent' then
      s = string_state(i)
    else
      s = key_state(i)
    end
    if op == 'set' then
      if s.t ~= 'none' and s.t ~= 'string' then
        return nil, wrong_type(key, s, op, 'string')
      end
      clear(s)
      s.t, s.v, s.fresh = 'string', arg, false
    elseif op == 'del' then
      clear(s)
    elseif op == 'incrby' then
      if s.t ~= 'none' and s.t ~= 'string' then
        return nil, wrong_type(key, s, op, 'string')
      end
      local cur = false
      if s.t == 'string' then
        cur = str_value(s, i)
      end
      local new, why = bump(key, cur, arg, lo, hi)
      if not new then
        return nil, why
      end
      clear(s)
      s.t, s.v, s.fresh = 'string', new, false
    elseif op == 'hset' or op == 'hincrby' then
      if s.t ~= 'none' and s.t ~= 'hash' then
        return nil, wrong_type(key, s, op, 'hash')
      end
      if s.t == 'none' then
        clear(s)
        s.t = 'hash'
      end
      local old = field_value(s, i, f)
      local new = arg
      if op == 'hincrby' then
        local why
        new, why = bump(key .. ' field ' .. f, old, arg, lo, hi)
        if not new then
          return nil, why
        end
      end
      if old == false then
        s.n = s.n + 1
      end
      s.fields[f] = new
    elseif op == 'hdel' then
      if s.t ~= 'none' and s.t ~= 'hash' then
        return nil, wrong_type(key, s, op, 'hash')
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
        return nil, name .. ': ' .. key .. ' does not exist, expected ' .. quote(arg)
      elseif s.t ~= 'string' then
        return nil, wrong_type(key, s, op, 'string')
      end
      local cur = str_value(s, i)
      if cur ~= arg then
        return nil, name .. ': ' .. key .. ' is ' .. quote(cur) .. ', expected ' .. quote(arg)
      end
    elseif op == 'absent' then
      if s.t == 'string' then
        return nil, name .. ': ' .. key .. ' is ' .. quote(str_value(s, i)) .. ', expected it not to exist'
      elseif s.t ~= 'none' then
        return nil, name .. ': ' .. key .. ' exists (a ' .. s.t .. '), expected it not to exist'
      end
    else
      return nil, name .. ': unknown op ' .. tostring(op)
    end
    if op ~= 'expect' and op ~= 'absent' then
      writes[#writes + 1] = {op, i, f, arg}
    end
  end
  return writes
end

-- Makes one staged write through `call` (redis.call or redis.pcall); returns its reply.
local function write(w, call)
  local op, key, f, arg = w[1], KEYS[2 * w[2]], w[3], w[4]
  if op == 'set' then
    return call('SET', key, arg)
  elseif op == 'del' then
    return call('DEL', key)
  elseif op == 'incrby' then
    return call('INCRBY', key, arg)
  elseif op == 'hset' then
    return call('HSET', key, f, arg)
  elseif op == 'hdel' then
    return call('HDEL', key, f)
  elseif op == 'hincrby' then
    return call('HINCRBY', key, f, arg)
  end
end

local function apply(writes)
  for _, w in ipairs(writes) do
    write(w, rcall)
  end
end

-- The staged writes Redis itself refuses, changing nothing, in every case where simulate would
-- refuse them after prepare (a wrong type, not an integer, past the 64-bit range). Not `set`:
-- SET overwrites a key of any type.
local SELF_CHECKED = {incrby = true, hincrby = true, hset = true, hdel = true, del = true}

-- Whether writes can be applied without simulating them first: one write, self-checked, made
-- as the script's first write (apply_first).
local function unchecked(writes)
  return #writes == 1 and SELF_CHECKED[writes[1][1]] == true
end

-- Makes writes[1] as the script's first write, with redis.pcall: a refusal (wrong type, out of
-- range, or the memory limit, which only a script's first write meets) changes nothing and is
-- returned as its error text; nil when the write was made.
local function apply_first(writes)
  local r = write(writes[1], redis.pcall)
  if type(r) == 'table' and r.err then
    return r.err
  end
  return nil
end
