{{ config(materialized='partition_overwrite', partition_by='fee_month', description='Revenue by month and adviser; only the months a batch touches are rewritten') }}

select
    fee_month,
    adviser_id,
    currency,
    count(*) as fees,
    count(distinct client_id) as clients,
    cast(sum(fee_amount) as decimal(18, 2)) as revenue,
    cast(sum(case when fee_amount < 0 then fee_amount else 0 end) as decimal(18, 2)) as refunds
from {{ ref('stg_fees') }}
group by fee_month, adviser_id, currency
