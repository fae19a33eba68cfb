-- Reconciliation: the sum of fee_amount is preserved from silver to the gold LTV (±0.01),
-- for the clients that have a profile.
select f.total as silver_total, l.total as gold_ltv_total
from (
    select sum(fee_amount) as total from {{ ref('stg_fees') }}
    where client_id in (select client_id from {{ ref('dim_clients') }})
) f
cross join (select sum(ltv_total) as total from {{ ref('rpt_client_ltv') }}) l
where abs(coalesce(f.total, 0) - coalesce(l.total, 0)) > 0.01
