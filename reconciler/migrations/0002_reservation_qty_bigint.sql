-- The engine's quantities are u32: int4 cannot hold those above 2^31-1,
-- and one such reservation would stop settlement for good.
ALTER TABLE stampede.reservations ALTER COLUMN qty TYPE bigint;
