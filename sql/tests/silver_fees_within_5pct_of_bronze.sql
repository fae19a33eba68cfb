-- Reconciliation: silver keeps every fee bronze holds, less at most 5% lost to dedup and filters.
select b.bronze_rows, s.silver_rows
from (select count(*) as bronze_rows from {{ source('fees') }}) b
cross join (select count(*) as silver_rows from {{ ref('stg_fees') }}) s
where s.silver_rows > b.bronze_rows or s.silver_rows < b.bronze_rows * 0.95
