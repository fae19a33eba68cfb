{{ config(
    materialized='incremental',
    unique_key=['l_orderkey', 'l_linenumber'],
    partition_by='l_shipmonth',
    description='Line items, the latest delivery of each (order, line)'
) }}
select
    l_orderkey, l_partkey, l_suppkey, l_linenumber, l_quantity, l_extendedprice, l_discount,
    l_tax, l_returnflag, l_linestatus, l_shipdate, l_commitdate, l_receiptdate, l_shipinstruct,
    l_shipmode, l_comment, l_shipdate_month as l_shipmonth, _ingested_at as loaded_at
from (
    select *, row_number() over (
        partition by l_orderkey, l_linenumber
        order by _ingested_at desc, _source_file desc, _source_line desc
    ) as delivery_rank
    from {{ source('lineitem') }}
) deliveries
where delivery_rank = 1
