{{ config(materialized='table', description='Lifetime value per client at 1, 3, 6 and 12 months from the first fee; refunds count',
    columns={'ltv_total': 'Net fees of the client to date (refunds negative)', 'cohort_month': 'Month of the first fee (YYYY-MM)'}) }}

select
    d.client_id,
    d.cohort_month,
    d.first_touch_adviser_id,
    d.first_fee_date,
    count(f.fee_id) as fees,
    cast(sum(case when f.fee_date < d.first_fee_date + interval '1 month' then f.fee_amount else 0 end) as decimal(18, 2)) as ltv_1m,
    cast(sum(case when f.fee_date < d.first_fee_date + interval '3 months' then f.fee_amount else 0 end) as decimal(18, 2)) as ltv_3m,
    cast(sum(case when f.fee_date < d.first_fee_date + interval '6 months' then f.fee_amount else 0 end) as decimal(18, 2)) as ltv_6m,
    cast(sum(case when f.fee_date < d.first_fee_date + interval '12 months' then f.fee_amount else 0 end) as decimal(18, 2)) as ltv_12m,
    cast(sum(f.fee_amount) as decimal(18, 2)) as ltv_total
from {{ ref('dim_clients') }} d
join {{ ref('stg_fees') }} f on f.client_id = d.client_id
group by d.client_id, d.cohort_month, d.first_touch_adviser_id, d.first_fee_date
