-- The baseline's RESERVE: per-user limit, stock decrement and a
-- reservation with a TTL, atomically (one Lua script, EVALSHA).
-- KEYS[1] lg:stock:{sku}  KEYS[2] lg:users:{sku}
-- ARGV: user, qty, limit, reservation_id, ttl_ms, sku
-- The reservation is lg:res:{id} = 'h:{sku}:{user}:{qty}' (held) with the
-- TTL; settle.lua turns it into 'c:...' (confirmed) or 'r:...' (released)
-- and keeps it, as stampede keeps settled reservations.
-- Returns stampede's status codes: 1 reserved, 10 sold_out,
-- 11 insufficient_stock, 12 limit_exceeded.
local res = 'lg:res:' .. ARGV[4]
if redis.call('EXISTS', res) == 1 then
  return 1 -- a retry of a success answers the original outcome
end
local qty = tonumber(ARGV[2])
-- Stock first, then the limit: the order stampede decides in.
local available = tonumber(redis.call('GET', KEYS[1]) or '0')
if available < qty then
  if available == 0 then return 10 end
  return 11
end
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if held + qty > tonumber(ARGV[3]) then
  return 12
end
redis.call('DECRBY', KEYS[1], qty)
redis.call('HINCRBY', KEYS[2], ARGV[1], qty)
redis.call('SET', res, 'h:' .. ARGV[6] .. ':' .. ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[5])
return 1
