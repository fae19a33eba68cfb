{{ config(
    materialized='incremental',
    unique_key='fee_id',
    partition_by='fee_month',
    lookback_column='fee_date',
    lookback_days=3,
    description='Platform fees, cleaned: one row per fee_id, the latest delivery wins (late corrections replace the original; exact re-deliveries collapse)'
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
    select
        *,
        row_number() over (
            partition by fee_id
            order by _ingested_at desc, _source_file desc, _source_line desc
        ) as delivery_rank
    from {{ source('fees') }}
) deliveries
where delivery_rank = 1
