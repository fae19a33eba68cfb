{{ config(
    materialized='incremental',
    unique_key='o_orderkey',
    partition_by='o_ordermonth',
    description='Orders, the latest delivery of each'
) }}
select
    o_orderkey, o_custkey, o_orderstatus, o_totalprice, o_orderdate, o_orderpriority, o_clerk,
    o_shippriority, o_comment, o_orderdate_month as o_ordermonth, _ingested_at as loaded_at
from (
    select *, row_number() over (
        partition by o_orderkey
        order by _ingested_at desc, _source_file desc, _source_line desc
    ) as delivery_rank
    from {{ source('orders') }}
) deliveries
where delivery_rank = 1
