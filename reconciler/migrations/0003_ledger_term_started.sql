-- A new leader's first log record (TERM_STARTED, issue 15) changes no sale:
-- its ledger row has no sku, and carries the term in qty.
ALTER TABLE stampede.ledger ALTER COLUMN sku DROP NOT NULL;
