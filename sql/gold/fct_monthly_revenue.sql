{{ config(materialized='partition_overwrite', partition_by='fee_month', description='Revenue by month and adviser; only the months a batch touches are rewritten') }}
-- Two steps instead of count(distinct client_id): the per-client step is an ordinary grouping
-- that spills to disk under the engine's memory limit, where a distinct count would hold every
-- (month, adviser, client) in memory at once.
with per_client as (
    select
        fee_month,
        adviser_id,
        currency,
        client_id,
        count(*) as fees,
        sum(fee_amount) as revenue,
        sum(case when fee_amount < 0 then fee_amount else 0 end) as refunds
    from {{ ref('stg_fees') }}
    group by fee_month, adviser_id, currency, client_id
)
select
    fee_month,
    adviser_id,
    currency,
    sum(fees) as fees,
    count(*) as clients,
    cast(sum(revenue) as decimal(18, 2)) as revenue,
    cast(sum(refunds) as decimal(18, 2)) as refunds
from per_client
group by fee_month, adviser_id, currency
