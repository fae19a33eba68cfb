{{ config(
    materialized='incremental',
    unique_key='fee_id',
    partition_by='fee_month',
    description='Platform fees, cleaned: one row per fee_id, the latest delivery wins (late corrections replace the original; exact re-deliveries collapse)',
    contract={'fee_id': 'string', 'client_id': 'string', 'adviser_id': 'string', 'fee_date': 'date',
              'fee_amount': 'decimal(12,2)', 'currency': 'string', 'note': 'string', 'fee_month': 'string',
              'loaded_at': 'timestamp'},
    tests=[
        {'type': 'not_null', 'column': 'fee_id'},
        {'type': 'unique', 'column': 'fee_id'},
        {'type': 'accepted_values', 'column': 'currency', 'values': ['GBP']},
        {'type': 'relationships', 'column': 'client_id', 'to': 'clients', 'field': 'client_id'},
        {'type': 'relationships', 'column': 'adviser_id', 'to': 'advisers', 'field': 'adviser_id'},
        {'type': 'expression', 'expression': 'fee_amount <> 0', 'severity': 'warn'},
    ]
) }}

select
    fee_id,
    client_id,
    adviser_id,
    fee_date,
    fee_amount,
    currency,
    note,
    to_char(fee_date, '%Y-%m') as fee_month,
    _ingested_at as loaded_at
from (
    -- The latest delivery of each fee_id. Incrementally the window sees only the new deliveries
    -- (no lookback_days): they are later than every row the table holds, so the MERGE on fee_id
    -- gives what a full rebuild would. One ordered pass (`lag(fee_id) over (order by fee_id,
    -- …)`) is faster, but its sort ends in a merge that cannot spill, so its memory grows with
    -- the data; partitioning by fee_id keeps memory flat (docs/decisions/0018).
    select
        *,
        row_number() over (
            partition by fee_id
            order by _ingested_at desc, _source_file desc, _source_line desc
        ) as delivery_rank
    from {{ source('fees') }}
) deliveries
where delivery_rank = 1
