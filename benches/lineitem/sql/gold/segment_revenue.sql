{{ config(materialized='table', description='Revenue by market segment and ship month') }}
select
    c.c_mktsegment,
    l.l_shipmonth,
    sum(l.l_extendedprice * (1 - l.l_discount)) as revenue,
    sum(l.l_quantity) as quantity,
    count(*) as lines
from {{ ref('stg_lineitem') }} l
join {{ ref('stg_orders') }} o on o.o_orderkey = l.l_orderkey
join {{ ref('customers') }} c on c.c_custkey = o.o_custkey
group by c.c_mktsegment, l.l_shipmonth
