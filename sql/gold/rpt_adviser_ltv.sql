{{ config(materialized='table', description='Lifetime value of clients by first-touch adviser') }}

select
    a.adviser_id,
    a.adviser_name,
    a.team,
    count(l.client_id) as clients,
    cast(coalesce(sum(l.ltv_total), 0) as decimal(18, 2)) as revenue,
    cast(round(avg(l.ltv_12m), 2) as decimal(18, 2)) as avg_ltv_12m
from {{ ref('advisers') }} a
left join {{ ref('rpt_client_ltv') }} l on l.first_touch_adviser_id = a.adviser_id
group by a.adviser_id, a.adviser_name, a.team
