{{ config(materialized='incremental', unique_key='client_id', recompute_by='client_id',
    description='One row per current client: cohort month and first-touch adviser (no PII)') }}
-- A client's row depends only on that client's profile and fees: a batch recomputes just the
-- clients whose profile or fees changed (recompute_by), from their whole fee history.

with first_fee as (
    select
        client_id,
        fee_date,
        adviser_id,
        row_number() over (partition by client_id order by fee_date, fee_id) as fee_rank
    from {{ ref('stg_fees') }}
)
select
    c.client_id,
    c.signup_date,
    c.city,
    f.fee_date as first_fee_date,
    to_char(f.fee_date, '%Y-%m') as cohort_month,
    f.adviser_id as first_touch_adviser_id
from {{ ref('clients') }} c
left join first_fee f on f.client_id = c.client_id and f.fee_rank = 1
where c.is_current
