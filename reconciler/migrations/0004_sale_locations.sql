-- Stock in several locations (warehouses) per sale (issue 20). Each sale
-- has one row per location; the sale's counters are their sums. The CHECK
-- is the invariant the engine asserts per location: a batch that would
-- break it fails and nothing is applied.
CREATE TABLE stampede.sale_locations (
    sku         bigint  NOT NULL REFERENCES stampede.sales (sku),
    location    integer NOT NULL CHECK (location BETWEEN 0 AND 65535),
    total       bigint  NOT NULL,
    available   bigint  NOT NULL,
    reserved    bigint  NOT NULL,
    sold        bigint  NOT NULL,
    updated_lsn bigint  NOT NULL,
    PRIMARY KEY (sku, location),
    CONSTRAINT location_counters_add_up CHECK (
        available >= 0 AND reserved >= 0 AND sold >= 0 AND available + reserved + sold = total
    )
);

-- A sale settled before locations existed has one: id 0, all its units.
INSERT INTO stampede.sale_locations (sku, location, total, available, reserved, sold, updated_lsn)
SELECT sku, 0, total, available, reserved, sold, updated_lsn FROM stampede.sales;

-- Where each reservation's units are (0: the one location of a sale made
-- without locations).
ALTER TABLE stampede.reservations ADD COLUMN location integer NOT NULL DEFAULT 0;

-- The location a ledger record acts on (RESERVED, RESTOCKED, LOCATION_ADDED;
-- the region of REGION_SET); NULL for the others.
ALTER TABLE stampede.ledger ADD COLUMN location integer;
