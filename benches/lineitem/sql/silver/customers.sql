{{ config(
    materialized='table',
    unique_key='c_custkey',
    pii=['c_name', 'c_address', 'c_phone'],
    description='Customers from the CSV and the JSON deliveries'
) }}
select c_custkey, c_name, c_address, c_nationkey, c_phone, c_acctbal, c_mktsegment
from {{ source('customers') }}
union all
select c_custkey, c_name, c_address, c_nationkey, c_phone, c_acctbal, c_mktsegment
from {{ source('customers_json') }}
