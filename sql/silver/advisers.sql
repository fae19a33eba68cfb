{{ config(materialized='table', description='Advisers, the latest delivery of each') }}

select adviser_id, name as adviser_name, team, region, joined_date
from (
    select *, row_number() over (partition by adviser_id order by _ingested_at desc, _source_line desc) as delivery_rank
    from {{ source('advisers') }}
) deliveries
where delivery_rank = 1
