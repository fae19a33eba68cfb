{{ config(materialized='incremental', unique_key='client_id', recompute_by='client_id',
    description='One row per current client: cohort month and first-touch adviser (no PII)') }}
-- A client's row depends only on that client's profile and fees: a batch recomputes just the
-- clients whose profile or fees changed (recompute_by), from their whole fee history.

-- The first fee of each client: an aggregate (first_value with its own order) rather than a
-- window partitioned by client, which DataFusion runs with state per client.
with first_fee as (
    select
        client_id,
        min(fee_date) as fee_date,
        first_value(adviser_id order by fee_date, fee_id) as adviser_id
    from {{ ref('stg_fees') }}
    group by client_id
)
select
    c.client_id,
    c.signup_date,
    c.city,
    f.fee_date as first_fee_date,
    to_char(f.fee_date, '%Y-%m') as cohort_month,
    f.adviser_id as first_touch_adviser_id
from {{ ref('clients') }} c
left join first_fee f on f.client_id = c.client_id
where c.is_current
