
½


10.0.0.7¨À"¦£
demo-1GET

user-agentdemo
:path
/orders/42
:methodGET
:schemehttps

:authorityapi.example.org"
/orders/42*api.example.org2httpsRHTTP/2