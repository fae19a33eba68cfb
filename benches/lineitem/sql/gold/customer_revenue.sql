{{ config(materialized='table', description='Revenue and orders per customer') }}
select
    o.o_custkey,
    count(distinct o.o_orderkey) as orders,
    sum(l.l_extendedprice * (1 - l.l_discount)) as revenue
from {{ ref('stg_lineitem') }} l
join {{ ref('stg_orders') }} o on o.o_orderkey = l.l_orderkey
group by o.o_custkey
