
Å


10.0.0.7¨À"®«
demo-1GET"
/orders/42*api.example.org2httpsRHTTP/2jp


:authorityapi.example.org

:path
/orders/42

:methodGET

:schemehttps


user-agent
curl/8.5.0