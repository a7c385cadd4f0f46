--[[
lib/i64.lua: exact signed 64-bit integer arithmetic on decimal strings, prepended to the scripts
that check counters (prepare, execute, compensate, commit).

Lua numbers are doubles, exact only up to 2^53, so INCRBY/HINCRBY results are added and compared
as decimal strings. A number is a pair {negative, digits} (digits without leading zeros; zero is
never negative).

  parse_int(s)  the number s as Redis parses an integer (no '+', no leading zeros, no spaces,
                no "-0", within i64), or nil
  add(x, y)     x + y, exact (may leave the i64 range)
  cmp(x, y)     -1, 0 or 1
  in_i64(x)     whether x fits in a signed 64-bit integer
  show(x)       decimal text of x
  ZERO          0
]]
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

