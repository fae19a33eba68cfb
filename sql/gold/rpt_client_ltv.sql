{{ config(materialized='table', description='Lifetime value per client at 1, 3, 6 and 12 months from the first fee; refunds count') }}

select
    d.client_id,
    d.cohort_month,
    d.first_touch_adviser_id,
    d.first_fee_date,
    count(f.fee_id) as fees,
    sum(case when f.fee_date < d.first_fee_date + interval '1 month' then f.fee_amount else 0 end) as ltv_1m,
    sum(case when f.fee_date < d.first_fee_date + interval '3 months' then f.fee_amount else 0 end) as ltv_3m,
    sum(case when f.fee_date < d.first_fee_date + interval '6 months' then f.fee_amount else 0 end) as ltv_6m,
    sum(case when f.fee_date < d.first_fee_date + interval '12 months' then f.fee_amount else 0 end) as ltv_12m,
    sum(f.fee_amount) as ltv_total
from {{ ref('dim_clients') }} d
join {{ ref('stg_fees') }} f on f.client_id = d.client_id
group by d.client_id, d.cohort_month, d.first_touch_adviser_id, d.first_fee_date
