-- Each client_id maps to exactly one National Insurance number, across its whole history.
select client_id, count(distinct nino) as ninos
from {{ ref('clients') }}
group by client_id
having count(distinct nino) > 1
