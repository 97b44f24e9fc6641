-- The baseline's CONFIRM (ARGV[2] = 'confirm') and RELEASE ('release'),
-- idempotent as stampede's are.
-- KEYS[1] lg:stock:{sku}  KEYS[2] lg:users:{sku}  KEYS[3] lg:sold:{sku}
-- ARGV: reservation_id, action
-- Returns 2 confirmed, 3 released, 16 expired (the key is gone: the TTL
-- passed, and with it the units, which Redis never returns to stock),
-- 17 already_released, 18 already_confirmed.
local res = 'lg:res:' .. ARGV[1]
local v = redis.call('GET', res)
if not v then
  return 16
end
local state, rest = string.match(v, '^(%a):(.*)$')
local user, qty = string.match(rest, '^%d+:(%d+):(%d+)$')
if ARGV[2] == 'confirm' then
  if state == 'c' then return 2 end
  if state == 'r' then return 17 end
  -- SET without PX drops the TTL: a sale is kept.
  redis.call('SET', res, 'c:' .. rest)
  redis.call('INCRBY', KEYS[3], qty)
  return 2
end
if state == 'r' then return 3 end
if state == 'c' then return 18 end
redis.call('SET', res, 'r:' .. rest)
redis.call('INCRBY', KEYS[1], qty)
redis.call('HINCRBY', KEYS[2], user, -tonumber(qty))
return 3
