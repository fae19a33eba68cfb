{{ config(materialized='incremental', unique_key='client_id', recompute_by='client_id',
    pii=['city'],
    description='One row per current client: cohort month, first-touch adviser and city (the only personal data here: city comes from the address)',
    columns={'city': 'City of the client address (PII: derived from bronze.clients.address)'}) }}
-- A client's row depends only on that client's profile and fees: a batch recomputes just the
-- clients whose profile or fees changed (recompute_by), from their whole fee history.

-- The first fee of each client: its day, and the adviser of its smallest fee_id that day.
{% if is_incremental() %}
-- A batch recomputes a fraction of the clients: one pass over their fees, with an aggregate
-- (first_value with its own order) rather than a window partitioned by client, which
-- DataFusion runs with state per client.
with first_fee as (
    select
        client_id,
        min(fee_date) as fee_date,
        first_value(adviser_id order by fee_date, fee_id) as adviser_id
    from {{ ref('stg_fees') }}
    group by client_id
)
{% else %}
-- A full build reads every fee, where that aggregate is slow (DataFusion compares its
-- two-column order value by value): the day by a plain min, then the fees of that day joined
-- back, a second pass that costs more than it saves on a batch.
-- `first_day` comes first in the join, so the side held in memory is one row per client.
with first_day as (
    select client_id, min(fee_date) as fee_date
    from {{ ref('stg_fees') }}
    group by client_id
),
first_fee as (
    select
        d.client_id,
        d.fee_date,
        first_value(f.adviser_id order by f.fee_id) as adviser_id
    from first_day d
    join {{ ref('stg_fees') }} f on f.client_id = d.client_id and f.fee_date = d.fee_date
    group by d.client_id, d.fee_date
)
{% endif %}
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
