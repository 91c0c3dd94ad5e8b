
J"HFGET"/
authorizationBearer a.a.a
AuthorizationBearer b.b.b