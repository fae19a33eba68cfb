{{ config(materialized='incremental', unique_key='client_id', recompute_by='client_id',
    description='Lifetime value per client at 1, 3, 6 and 12 months from the first fee; refunds count',
    columns={'ltv_total': 'Net fees of the client to date (refunds negative)', 'cohort_month': 'Month of the first fee (YYYY-MM)'}) }}

-- Each client's horizons are computed once per client (date arithmetic per fee row was a
-- third of the model's time), then the sums per client (grouped by the one key), then the
-- client's attributes joined on.
with horizons as (
    select
        client_id,
        first_fee_date + interval '1 month' as end_1m,
        first_fee_date + interval '3 months' as end_3m,
        first_fee_date + interval '6 months' as end_6m,
        first_fee_date + interval '12 months' as end_12m
    from {{ ref('dim_clients') }}
),
per_client as (
    select
        f.client_id,
        count(f.fee_id) as fees,
        sum(case when f.fee_date < h.end_1m then f.fee_amount else 0 end) as ltv_1m,
        sum(case when f.fee_date < h.end_3m then f.fee_amount else 0 end) as ltv_3m,
        sum(case when f.fee_date < h.end_6m then f.fee_amount else 0 end) as ltv_6m,
        sum(case when f.fee_date < h.end_12m then f.fee_amount else 0 end) as ltv_12m,
        sum(f.fee_amount) as ltv_total
    from {{ ref('stg_fees') }} f
    join horizons h on f.client_id = h.client_id
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
