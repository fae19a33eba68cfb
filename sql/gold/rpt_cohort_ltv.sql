{{ config(materialized='table', description='Average lifetime value by cohort (month of first fee)') }}

select
    cohort_month,
    count(*) as clients,
    sum(ltv_total) as revenue,
    round(avg(ltv_1m), 2) as avg_ltv_1m,
    round(avg(ltv_3m), 2) as avg_ltv_3m,
    round(avg(ltv_6m), 2) as avg_ltv_6m,
    round(avg(ltv_12m), 2) as avg_ltv_12m
from {{ ref('rpt_client_ltv') }}
group by cohort_month
