-- The baseline's CONFIRM (ARGV[2] = 'confirm') and RELEASE ('release').
-- KEYS[1] lg:stock:{sku}  KEYS[2] lg:users:{sku}  KEYS[3] lg:sold:{sku}
-- ARGV: reservation_id, action
-- Returns 2 confirmed, 3 released, 16 expired (the key is gone: the TTL
-- passed, and with it the units, which Redis never returns to stock).
local res = 'lg:res:' .. ARGV[1]
local v = redis.call('GET', res)
if not v then
  return 16
end
local user, qty = string.match(v, '^(%d+):(%d+)$')
redis.call('DEL', res)
if ARGV[2] == 'confirm' then
  redis.call('INCRBY', KEYS[3], qty)
  return 2
end
redis.call('INCRBY', KEYS[1], qty)
redis.call('HINCRBY', KEYS[2], user, -tonumber(qty))
return 3
