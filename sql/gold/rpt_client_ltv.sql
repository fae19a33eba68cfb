{{ config(materialized='incremental', unique_key='client_id', recompute_by='client_id',
    description='Lifetime value per client at 1, 3, 6 and 12 months from the first fee; refunds count',
    columns={'ltv_total': 'Net fees of the client to date (refunds negative)', 'cohort_month': 'Month of the first fee (YYYY-MM)'}) }}

-- Sums per client first (grouped by the one key), then the client's attributes joined on.
with per_client as (
    select
        f.client_id,
        count(f.fee_id) as fees,
        sum(case when f.fee_date < d.first_fee_date + interval '1 month' then f.fee_amount else 0 end) as ltv_1m,
        sum(case when f.fee_date < d.first_fee_date + interval '3 months' then f.fee_amount else 0 end) as ltv_3m,
        sum(case when f.fee_date < d.first_fee_date + interval '6 months' then f.fee_amount else 0 end) as ltv_6m,
        sum(case when f.fee_date < d.first_fee_date + interval '12 months' then f.fee_amount else 0 end) as ltv_12m,
        sum(f.fee_amount) as ltv_total
    from {{ ref('stg_fees') }} f
    join {{ ref('dim_clients') }} d on f.client_id = d.client_id
    group by f.client_id
)
select
    d.client_id,
    d.cohort_month,
    d.first_touch_adviser_id,
    d.first_fee_date,
    p.fees,
    cast(p.ltv_1m as decimal(18, 2)) as ltv_1m,
    cast(p.ltv_3m as decimal(18, 2)) as ltv_3m,
    cast(p.ltv_6m as decimal(18, 2)) as ltv_6m,
    cast(p.ltv_12m as decimal(18, 2)) as ltv_12m,
    cast(p.ltv_total as decimal(18, 2)) as ltv_total
from {{ ref('dim_clients') }} d
join per_client p on p.client_id = d.client_id
