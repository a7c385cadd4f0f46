--[[
commit: phase two (commit) of a 2PC branch at a key-value participant. Idempotent.

Applies the writes staged by `prepare`, in order (SET, DEL, INCRBY, HSET, HDEL, HINCRBY), releases
the branch's locks (only those still owned by this barrier), drops the staging, marks the barrier
committed and lets it expire after the retention window. A repeat is a no-op.

The writes were checked at prepare and their keys stayed locked, so they cannot fail unless a
plain (non-redtx) writer changed a locked key's type meanwhile. Each write is therefore run with
`redis.pcall`: a failing write is reported (code 1 with its error) instead of aborting the script
half-way, since a re-run would apply the earlier writes twice.

Input:
  KEYS[1]      barrier, rtx:bar:<participant>:<txn> (hash)
  KEYS[2i]     i-th distinct user key of the branch (i = 1..n, in Branch::keys() order)
  KEYS[2i+1]   lock of that key, rtx:lock:<key>
  ARGV[1]      participant name
  ARGV[2]      now, ms since the epoch
  ARGV[3]      retention of the committed barrier, ms; it is kept at least until the
               branch's deadline plus a clock-skew margin (a duplicate prepare arriving before
               the deadline must find it)

Output: {code, detail}
   1, errors   committed now; errors is "" or the "; "-joined errors of writes that failed
   2, ""       already committed (a repeat)
  -1, state    never prepared: state is "missing", "refused" or "aborted"; nothing applied
  -2, detail   the KEYS differ from the keys the branch was prepared with; nothing applied
]]
-- rcall, bar, expire_after, prepared_keys, release: lua/lib/barrier.lua (prepended).

local state = rcall('HGET', bar, 'state')
if state == 'committed' then
  return {2, ''}
end
if state ~= 'prepared' then
  return {-1, state or 'missing'}
end

local keys, differ = prepared_keys()
if not keys then
  return {-2, differ}
end

local errors = {}
for _, w in ipairs(cmsgpack.unpack(rcall('HGET', bar, 'ops'))) do
  local op, key, f, arg = w[1], KEYS[2 * w[2]], w[3], w[4]
  local r
  if op == 'set' then
    r = redis.pcall('SET', key, arg)
  elseif op == 'del' then
    r = redis.pcall('DEL', key)
  elseif op == 'incrby' then
    r = redis.pcall('INCRBY', key, arg)
  elseif op == 'hset' then
    r = redis.pcall('HSET', key, f, arg)
  elseif op == 'hdel' then
    r = redis.pcall('HDEL', key, f)
  elseif op == 'hincrby' then
    r = redis.pcall('HINCRBY', key, f, arg)
  else
    r = {err = 'unknown staged op ' .. tostring(op)}
  end
  if type(r) == 'table' and r.err then
    errors[#errors + 1] = op .. ' ' .. key .. ': ' .. r.err
  end
end

release(keys)
rcall('HSET', bar, 'state', 'committed', 'done', ARGV[2])
expire_after(tonumber(rcall('HGET', bar, 'deadline') or '0'))
return {1, table.concat(errors, '; ')}
