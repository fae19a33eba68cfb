{{ config(materialized='table', description='Average lifetime value by cohort (month of first fee)') }}

select
    cohort_month,
    count(*) as clients,
    cast(sum(ltv_total) as decimal(18, 2)) as revenue,
    cast(round(avg(ltv_1m), 2) as decimal(18, 2)) as avg_ltv_1m,
    cast(round(avg(ltv_3m), 2) as decimal(18, 2)) as avg_ltv_3m,
    cast(round(avg(ltv_6m), 2) as decimal(18, 2)) as avg_ltv_6m,
    cast(round(avg(ltv_12m), 2) as decimal(18, 2)) as avg_ltv_12m
from {{ ref('rpt_client_ltv') }}
group by cohort_month
